"""The engines behind the backends, and the one HTTP client that reaches them (`upstream`, where
aiohttp's errors become the gateway's): what each engine is and how it is asked."""
