"""The in-process front door: `gmesh.aio.channel("gmesh:///orders")`, a `grpc.aio.Channel` that
runs the mesh chain with no proxy hop."""
