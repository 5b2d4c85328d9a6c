"""Routing: the Route kind (`spec`), its compiled form (`table`), and pure decision logic with
no I/O — string matches, weighted splits, retry budgets and backoff.

The ROUTE and RETRY filters (`gmesh/plugins/router.py`, `gmesh/plugins/retry.py`) and
`gmesh explain` run these same objects; they are tested as plain functions.
"""
