from xdpwatch.cli import main

main()
