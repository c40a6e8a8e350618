"""The end-to-end lab: a failoverd cluster whose hosts are network namespaces,
with a real VIP and a client host that knows only the VIP (lab.py), what it
watches (checker.py), and the fault matrix and stability profile run on it
(scenarios.py), shared by tests/e2e and bench/failover.py, bench/demo.py.

client.py and slowlink.py are scripts the lab starts by their path, inside
the namespaces; they import nothing from here.
"""
