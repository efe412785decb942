from ernielab.serve.cli import app

app()
