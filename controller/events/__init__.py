"""What happened, as typed events, and the bus that carries each one once to every subscriber."""
