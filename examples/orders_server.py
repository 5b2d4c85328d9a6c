"""Run the example Orders service, registered in the mesh for as long as it runs.

    python examples/orders_server.py --version v2 [--listen 127.0.0.1:50051] [--no-register]

The service itself is gmesh/examples/orders.py (installed with gmesh, so `gmesh demo` can run
it too); read it to see how a Python gRPC server joins the mesh with `gmesh.register()`.
"""

from gmesh.examples.orders import main

if __name__ == "__main__":
    main()
