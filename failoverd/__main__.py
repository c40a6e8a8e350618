from failoverd.cli import failoverd_main

if __name__ == "__main__":
    failoverd_main(prog_name="failoverd")
