from relayport.cli import main

main()
