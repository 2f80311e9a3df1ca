"""The Ray Serve endpoint: REST API, web page, durable jobs (build_app in app.py, `dreamix serve` in cli.py)."""
