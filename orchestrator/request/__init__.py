"""One request's way: its route, the slot it waits for, its send, the answer relayed back, the slot's
release, the accounting; and the answers the gateway makes itself (housekeeping)."""
