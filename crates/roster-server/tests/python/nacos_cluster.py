"""nacos-sdk-python 2.0.11's gRPC client against a Roster cluster.

Usage: nacos_cluster.py MODE SERVERS PORT_OFFSET WORK_DIR, where SERVERS is
a comma-separated list of the nodes' HTTP addresses (each node's gRPC port
is its HTTP port + PORT_OFFSET). Exits non-zero on failure.
- MODE `register`: registers 10.7.0.1:8080 in `py-cluster`, prints
  "registered", and keeps the client (and so its registration) alive until
  standard input closes; the test kills its node meanwhile and checks the
  client registers again on another.
- MODE `subscribe`: subscribes to `py-cluster` and prints "pushed" once a
  push lists 10.7.0.1:8080.
"""

import asyncio
import os
import sys

from v2.nacos import ClientConfigBuilder, GRPCConfig, NacosNamingService
from v2.nacos.naming.model.naming_param import (
    RegisterInstanceParam,
    SubscribeServiceParam,
)

SERVICE = "py-cluster"


async def main(mode, servers, offset, work_dir):
    config = (
        ClientConfigBuilder()
        .server_address(servers)
        .namespace_id("public")
        .log_level("WARNING")
        .log_dir(work_dir)
        .cache_dir(work_dir)
        .grpc_config(GRPCConfig(port_offset=offset))
        .build()
    )
    naming = await NacosNamingService.create_naming_service(config)
    if mode == "register":
        assert await naming.register_instance(
            RegisterInstanceParam(service_name=SERVICE, ip="10.7.0.1", port=8080)
        )
        print("registered", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)
    else:
        pushed = asyncio.Event()

        async def on_change(instances):
            if any(i.ip == "10.7.0.1" and i.port == 8080 for i in instances):
                pushed.set()

        await naming.subscribe(
            SubscribeServiceParam(service_name=SERVICE, subscribe_callback=on_change)
        )
        await pushed.wait()
        print("pushed", flush=True)


if __name__ == "__main__":
    mode, servers, offset, work_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    asyncio.run(asyncio.wait_for(main(mode, servers, offset, work_dir), 170))
    sys.stdout.flush()
    os._exit(0)
