"""Sans-IO protocol: the frame codec (:mod:`.wire`) and the shared-secret handshake
(:mod:`.handshake`). Nothing here imports asyncio or sockets."""
