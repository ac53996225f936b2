from morphcli.cli.app import main

main()
