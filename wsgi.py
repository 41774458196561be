from broker import create_app

app = create_app()
