from rotfuse.cli import main

main()
