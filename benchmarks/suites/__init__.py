"""The registered suites (importing this package registers them with harness.SUITES)."""
from . import aoti, backend, cpu, decode, families, gpu, methods  # noqa: F401
