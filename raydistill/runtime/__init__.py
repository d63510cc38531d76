"""Ray lives here and only here: the driver, the actor shells, the transport, placement; and the in-process reference."""
