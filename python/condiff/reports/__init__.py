"""Reports the command line prints: tables and their prose over numbers the library computes."""
