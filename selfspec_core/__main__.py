from selfspec_core.cli.main import main

main()
