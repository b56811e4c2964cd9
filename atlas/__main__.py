from atlas.cli import run

run()
