"""Fakes of what the product talks to (kernel interfaces, CRIU, peers), for tests that
need no root."""
