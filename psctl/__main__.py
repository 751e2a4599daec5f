from psctl.cli.main import main

main()
