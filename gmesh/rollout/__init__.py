"""Blue-green switches and progressive canary rollouts, driven from etcd.

A rollout moves the weights of a service's default route rule (the last rule, matching
every call) between two subsets. Its state lives in etcd (`rollouts/<service>`); one
controller at a time holds the service's lock (a leased key) and every write it makes is
conditional on still holding it, so a controller cut off cannot fight its successor.
A controller that dies leaves the state where it was; the next one resumes at that step.
"""
