"""Multi-turn chat benchmark: sessionserve side by side with its peers."""
