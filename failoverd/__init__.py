"""failoverd: primary-standby failover for PostgreSQL, decided by a quorum of its own supervisors."""

__version__ = "0.1.0"
