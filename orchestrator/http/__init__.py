"""The server's edge: the aiohttp app, its listener, access control, request bodies, the handlers,
and the live /dashboard page."""
