"""What tests/ and bench/ share: waiting for a condition, free loopback ports,
throwaway TLS certificates, PostgreSQL and cluster helpers, the namespace lab.

    from tests.support import wait_for, free_port     # light: no failoverd, no asyncpg
    from tests.support.tls import self_signed_cert
    from tests.support.postgres import find_bin_dir, pg_os_user, require_bin_dir
    from tests.support.cluster import LocalCluster, DualPrimarySampler, start_watched
    from tests.support.netns import Lab
    from tests.support.e2e.lab import E2ELab          # the end-to-end lab (root, ip netns)

Importing this package itself stays cheap: the heavier modules are imported
only by whoever names them.
"""

from tests.support.ports import free_port, free_ports
from tests.support.waiting import wait_for, wait_for_sync

__all__ = ["free_port", "free_ports", "wait_for", "wait_for_sync"]
