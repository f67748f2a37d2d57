from latentdist.cli import main

main()
