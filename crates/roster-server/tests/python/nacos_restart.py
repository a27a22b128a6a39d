"""nacos-sdk-python 2.0.11's gRPC client across a restart of the node.

Registers one instance with the gRPC client (`v2.nacos`), prints
"registered", then keeps the client running (and so its registration
alive) until standard input closes. The test restarts the node meanwhile
and checks that the client reconnects and registers again by itself.
Usage: nacos_restart.py HTTP_PORT GRPC_PORT WORK_DIR. Exits non-zero on failure.
"""

import asyncio
import os
import sys

from v2.nacos import ClientConfigBuilder, GRPCConfig, NacosNamingService
from v2.nacos.naming.model.naming_param import RegisterInstanceParam

SERVICE = "py-restart"


async def main(http_port, grpc_port, work_dir):
    server = f"127.0.0.1:{http_port}"
    config = (
        ClientConfigBuilder()
        .server_address(server)
        .namespace_id("public")
        .log_level("WARNING")
        .log_dir(work_dir)
        .cache_dir(work_dir)
        .grpc_config(GRPCConfig(port_offset=grpc_port - http_port))
        .build()
    )
    naming = await NacosNamingService.create_naming_service(config)
    assert await naming.register_instance(
        RegisterInstanceParam(service_name=SERVICE, ip="10.9.9.9", port=9999)
    )
    print("registered", flush=True)
    # Held until the test closes our standard input.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    print("python restart client: done", flush=True)


if __name__ == "__main__":
    http_port, grpc_port, work_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    asyncio.run(asyncio.wait_for(main(http_port, grpc_port, work_dir), 170))
    sys.stdout.flush()
    os._exit(0)
