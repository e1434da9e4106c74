from senet_pl.cli import main

main()
