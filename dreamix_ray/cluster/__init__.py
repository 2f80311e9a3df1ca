"""Ray wiring of the core: Ray Data stage actors, Ray Train loops, the Ray Serve app; the only code that imports ray."""
