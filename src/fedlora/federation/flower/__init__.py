"""fedlora on a real Flower deployment: a SuperLink and one SuperNode per site.

    server_app.py   the ServerApp: builds the server side (method, initial adapter, evaluator
                    on the server's own held-out data) and runs fedlora's one round loop
    transport.py    the Transport that round loop talks to: Flower messages via the Grid
    client_app.py   the ClientApp: a site trains its own client on its own data
    site.py         what a site builds from its node config
    sitestate.py    what a site keeps on its own disk between rounds and restarts (its ledger)
    messages.py     the records that travel (fedlora's safetensors payloads, carried as bytes)
    deploy.py       the app folder for `flwr run`, and the superlink / supernode commands

Flower is an optional dependency (`pip install "fedlora[flower]"`); importing this package
does not import it.
"""
