"""The wire protocol shared by the market server and its clients."""
