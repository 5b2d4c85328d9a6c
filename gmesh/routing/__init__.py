"""Pure routing logic, no I/O: string matches, weighted splits, retry budgets and backoff.

The Route and retry filters (`gmesh/plugins/router.py`, `gmesh/plugins/retry.py`) and
`gmesh explain` run these same objects; they are tested as plain functions.
"""
