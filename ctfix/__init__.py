"""ctfix: find, explain and fix UDP services that answer from the wrong source address.

Keep this module free of imports: `ctfix --help` must start in well under 150 ms, so
heavy libraries (pyroute2, iptc, prometheus_client) are imported only where used.
"""

__version__ = "0.1.0"
