"""Multi-turn chat benchmark: sessionserve side by side with its peers (see DESIGN.md §5)."""
