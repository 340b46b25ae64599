"""The Ray Serve engine: the ingress (the service's FastAPI app, encoders, router and policy) and one deployment
per expert, each batched and scaled on its own. Needs the ``ray`` extra (``pip install 'dynfuse[ray]'``)."""
