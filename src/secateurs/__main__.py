from secateurs.cli import app

app(prog_name="secateurs")
