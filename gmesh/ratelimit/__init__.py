"""Rate limits and quotas: token buckets (GCRA) per key, the RateLimit kind, checks in the LIMIT phase."""
