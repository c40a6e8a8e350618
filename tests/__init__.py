"""The test suite as a package, so that `tests.support` (the helpers shared by
the tests and bench/) imports the same way everywhere.

Only `tests/` and `tests/support/` are packages. The test directories have no
__init__.py: pytest imports their modules by basename with the directory put
on sys.path (rootdir-relative "prepend" imports), and loading tests/conftest.py
as `tests.conftest` puts the repository root on sys.path, which is what makes
`from tests.support import ...` work under pytest. The bench scripts put the
repository root on sys.path themselves.
"""
