"""nacos-sdk-python 2.0.11 against a running Roster node.

Registers through the HTTP v1 client (`nacos.NacosClient`), lists and
subscribes through the gRPC client (`v2.nacos`), and checks that changes made
over HTTP are pushed to the gRPC subscriber, and the reverse.
Usage: nacos_clients.py HTTP_PORT GRPC_PORT WORK_DIR. Exits non-zero on failure.
"""

import asyncio
import os
import sys
import time

import nacos
from v2.nacos import ClientConfigBuilder, GRPCConfig, NacosNamingService
from v2.nacos.naming.model.naming_param import (
    DeregisterInstanceParam,
    ListInstanceParam,
    RegisterInstanceParam,
    SubscribeServiceParam,
)

WAIT = 20.0
SERVICE = "py-orders"


def addresses(instances):
    return sorted(f"{i.ip}:{i.port}" for i in instances)


async def until(what, check):
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def main(http_port, grpc_port, work_dir):
    server = f"127.0.0.1:{http_port}"
    v1 = nacos.NacosClient(server_addresses=server, namespace="public")
    assert v1.add_naming_instance(
        SERVICE, "10.1.0.1", 8080, metadata={"lang": "py"}, heartbeat_interval=1
    ), "HTTP v1 register"

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

    # The gRPC client lists what the HTTP client registered.
    listed = await naming.list_instances(
        ListInstanceParam(service_name=SERVICE, subscribe=False, healthy_only=None)
    )
    assert addresses(listed) == ["10.1.0.1:8080"], addresses(listed)
    assert listed[0].metadata.get("lang") == "py", listed[0].metadata

    # Pushes: an HTTP registration and an HTTP deregistration.
    pushes = asyncio.Queue()

    async def on_change(instances):
        await pushes.put(addresses(instances))

    await naming.subscribe(
        SubscribeServiceParam(service_name=SERVICE, subscribe_callback=on_change)
    )

    async def pushed(wanted):
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no push of {wanted}")
            got = await asyncio.wait_for(pushes.get(), left)
            if got == wanted:
                return

    assert v1.add_naming_instance(SERVICE, "10.1.0.2", 8080, heartbeat_interval=1)
    await pushed(["10.1.0.1:8080", "10.1.0.2:8080"])
    assert v1.remove_naming_instance(SERVICE, "10.1.0.1", 8080)
    await pushed(["10.1.0.2:8080"])

    # The reverse: a gRPC registration is seen by the HTTP client.
    assert await naming.register_instance(
        RegisterInstanceParam(service_name=SERVICE, ip="10.1.0.3", port=9090)
    )
    await pushed(["10.1.0.2:8080", "10.1.0.3:9090"])

    async def http_sees_both():
        hosts = v1.list_naming_instance(SERVICE)["hosts"]
        return sorted(f"{h['ip']}:{h['port']}" for h in hosts) == [
            "10.1.0.2:8080",
            "10.1.0.3:9090",
        ]

    await until("the HTTP list to show the gRPC instance", http_sees_both)
    await naming.deregister_instance(
        DeregisterInstanceParam(service_name=SERVICE, ip="10.1.0.3", port=9090)
    )
    await pushed(["10.1.0.2:8080"])
    try:
        await naming.shutdown()
    except TypeError:
        # 2.0.11's shutdown awaits a non-coroutine after closing; harmless.
        pass
    print("python nacos clients: ok")


if __name__ == "__main__":
    http_port, grpc_port, work_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    asyncio.run(asyncio.wait_for(main(http_port, grpc_port, work_dir), 120))
    sys.stdout.flush()
    # The v1 client's heartbeat threads are not daemons.
    os._exit(0)
