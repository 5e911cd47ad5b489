"""Everything the tests share: constants, model builders, the process harness, in-memory fakes
of the ports, a fault proxy, a private redis-server and a Prometheus server helper.

- :mod:`constants`: the tenant, users and client of every test, defined once;
- :mod:`builders`: machines, connections, views, fleets and requests as models, and fleet files;
- :mod:`processes`: a private namespace per test, the product's processes, clean-up;
- :mod:`e2e`: waiting for runs, the CLI, machines online (end-to-end tests);
- :mod:`identity`: the local identity provider and vaults as processes, looking for secrets;
- :mod:`fakes`: in-memory implementations of the ports, for the in-process use-case tests;
- :mod:`faultproxy`, :mod:`privateredis`, :mod:`promserver`: the fault tests' and the
  observability tests' own services;
- :mod:`break_one_line`: the mutation check of the in-process tests (not part of ``make test``).
"""
