#!/usr/bin/env python3
"""A TCP proxy that is a slow link: bench/throttle.py LISTEN_PORT UPSTREAM RATE

Forwards 127.0.0.1:LISTEN_PORT to UPSTREAM (host:port). What comes back from
the upstream is paced to RATE bytes a second across all connections, as one
link shared by every download would be; what the client sends passes at
once. Benchmark 7 puts it between a device and the registry to measure
upgrades over a metered link rather than loopback. Runs until killed.
"""
import asyncio
import sys
import time

CHUNK = 16 << 10


class Link:
    """A token bucket: at most `rate` bytes a second, bursts of CHUNK."""

    def __init__(self, rate):
        self.rate = rate
        self.tokens = 0.0
        self.last = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, n):
        async with self.lock:
            while True:
                now = time.monotonic()
                self.tokens = min(CHUNK, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


async def pipe(reader, writer, link=None):
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            if link:
                await link.take(len(data))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def main():
    port, upstream, rate = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    host, up_port = upstream.rsplit(":", 1)
    link = Link(rate)

    async def handle(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(host, int(up_port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w, link))

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
