"""`ray start` for a second node of a test cluster on one machine, on loopback.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 python tests/ray_node.py start --address=127.0.0.1:PORT \
        --node-ip-address=127.0.0.1 --num-cpus=2 --block

Ray refuses to add a node unless clusters are enabled, and with clusters enabled it
replaces a 127.0.0.1 head address by this machine's interface address (found by asking
the route to a public address). The tests address nothing but loopback, so this keeps the
address as given; everything else is Ray's own `ray start`.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from ray._private import services

    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as given
    from ray.scripts.scripts import main

    sys.argv[0] = "ray"
    sys.exit(main())
