from excise.cli import main

main()
