"""Identity and secrets: msal token broker, sign-in, credential vaults.

- :class:`~dispatcher.adapters.identity.token_broker.TokenBroker`: access tokens of sign-in
  connections, refreshed single-flight across replicas;
- :func:`~dispatcher.adapters.identity.sign_in.sign_in_with_device_code`: signs a connection in;
- :class:`~dispatcher.adapters.identity.credentials.CredentialResolver`: passwords of
  credentials connections (stored, Azure Key Vault, CyberArk CCP), fetched at dispatch time;
- :func:`~dispatcher.adapters.identity.retry.retry_transient`: retries within a deadline.
"""
