from analysis import main

main()
