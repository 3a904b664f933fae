from bonsai.cli import main

main()
