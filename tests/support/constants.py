"""The values every test shares, defined once."""

from __future__ import annotations

# The environment's tenant. It has letters, so that the case rules of tenant ids show.
TENANT = "0f8fad5b-d9cb-469f-a165-70867728950e"
OTHER_TENANT = "7c9e6679-7425-40de-944b-e07fc1f90ae7"

OWNER = "alice@contoso.com"  # owns the connections and submits the runs, unless a test says
ALICE_WIN = "CONTOSO\\alice"  # Windows accounts of credentials connections
BOB_WIN = "CONTOSO\\bob"
ROBOT = "CONTOSO\\svc-fin"
SIGN_IN_USER = "bob@contoso.com"  # the account of sign-in connections in the identity tests
PASSWORD = "s3cret-pw"  # the stored password of credentials connections in fleet files

# The dispatcher's app registration at the local identity provider. The secret is known, so
# that the tests can look for it where it must never appear.
CLIENT_ID = "rundispatch-tests"
CLIENT_SECRET = "e2e-client-secret-Zq8Wv3-KNOWN"
