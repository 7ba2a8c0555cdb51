from msp.cli import main

main()
