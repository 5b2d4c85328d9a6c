"""`gmesh dashboard`: a web page that shows the mesh, live — service graph, services, rollouts,
config history and running processes — from what every process already publishes to etcd."""
