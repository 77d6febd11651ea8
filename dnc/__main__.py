from dnc.cli import run

run()
