from dnc.cli import main

main()
