"""tenantpool's demo: a multi-tenant notes service on FastAPI (``python -m demo_api``).

Modules, one concept each: ``_settings`` (environment), ``_local_postgres`` (running a
PostgreSQL server process, shared with the test suite), ``_embedded`` (the demo's own server
and its data folder), ``_credentials`` (passwords, DSNs), ``_registry`` (the tenant registry,
provisioning, the resolver), ``_models`` (pydantic), ``_app`` (the FastAPI application, wired
with ``tenantpool.fastapi``), ``_dashboard`` (the page at ``/``).

Importing this package imports nothing heavy: the test suite uses ``_local_postgres`` alone.
"""
